-- Sluice demo: a stream of page clicks (newline-delimited JSON files) joined
-- with a static table of users, filtered and projected per micro-batch; and
-- the same stream counted per hour in a windowed aggregate whose state lives
-- in the checkpoint.
-- Run from the repository root:
--   cargo run -p sluice-cli -- run examples/demo.sql
-- Each file in examples/data/clicks is one micro-batch (max_files_per_trigger = 1);
-- the trigger is available-now, so the run stops when every file is processed.

SET trigger = 'available-now';

CREATE SOURCE clicks (
  user_id BIGINT,
  url VARCHAR,
  ms_on_page BIGINT,
  ts TIMESTAMP,
  WATERMARK FOR ts AS ts - INTERVAL '10' SECOND
) WITH (connector = 'file', path = 'examples/data/clicks', format = 'json',
        max_files_per_trigger = 1);

CREATE EXTERNAL TABLE users STORED AS CSV LOCATION 'examples/data/users.csv'
  OPTIONS ('format.has_header' 'true');

-- Long reads, with who read them (clicks of unknown users are kept, with a NULL name).
CREATE SINK long_reads WITH (connector = 'console') AS
SELECT c.ts, c.user_id, u.name, u.country, c.url,
       round(c.ms_on_page / 1000.0, 1) AS seconds,
       upper(split_part(c.url, '/', 2)) AS section
FROM clicks c LEFT JOIN users u ON c.user_id = u.user_id
WHERE c.ms_on_page >= 1000;

-- Clicks per hour: a window is printed once the watermark (latest click time
-- minus 10 s) passes its end, i.e. in the batch that brings the next hour.
CREATE SINK clicks_per_hour WITH (connector = 'console', output_mode = 'append') AS
SELECT window_start, window_end, count(*) AS clicks, count(DISTINCT user_id) AS users,
       sum(ms_on_page) / 1000 AS seconds_on_page
FROM TUMBLE(clicks, ts, INTERVAL '1' HOUR)
GROUP BY window_start, window_end;
