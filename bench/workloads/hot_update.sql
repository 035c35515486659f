-- Baseline: every client updates the same row (the "hot tenant" of plain SQL).
UPDATE bench_hot SET n = n + 1 WHERE id = 1;
