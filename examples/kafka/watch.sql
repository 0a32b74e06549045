-- Prints the records of `clicks_per_minute` as they arrive (Kafka → console).
CREATE SOURCE per_minute (window_start TIMESTAMP, section VARCHAR, clicks BIGINT,
                          ms_on_page BIGINT, _key VARCHAR, _partition INT, _offset BIGINT)
  WITH (connector = 'kafka', 'bootstrap.servers' = '127.0.0.1:9092',
        topic = 'clicks_per_minute', format = 'json');

CREATE SINK show WITH (connector = 'console') AS SELECT * FROM per_minute;
