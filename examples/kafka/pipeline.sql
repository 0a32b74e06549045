-- Kafka → windowed aggregate → Kafka: clicks per section per minute, written
-- exactly once to the topic `clicks_per_minute` as each minute closes.
-- See examples/kafka/README.md for the broker and the topics.

CREATE SOURCE clicks (
  user_id BIGINT, url VARCHAR, ms_on_page BIGINT, ts TIMESTAMP,
  _partition INT, _offset BIGINT,
  WATERMARK FOR ts AS ts - INTERVAL '10' SECOND
) WITH (connector = 'kafka', 'bootstrap.servers' = '127.0.0.1:9092', topic = 'clicks',
        format = 'json', starting_offsets = 'earliest', max_rows_per_trigger = 1000,
        on_error = 'dead_letter', dead_letter = 'bad_clicks');

CREATE SINK clicks_per_minute WITH (connector = 'kafka', 'bootstrap.servers' = '127.0.0.1:9092',
                                    topic = 'clicks_per_minute', format = 'json',
                                    key = 'section', output_mode = 'append',
                                    'kafka.batch.num.messages' = '1') AS
SELECT window_start, split_part(url, '/', 2) AS section, count(*) AS clicks,
       sum(ms_on_page) AS ms_on_page
FROM TUMBLE(clicks, ts, INTERVAL '1' MINUTE)
GROUP BY window_start, window_end, split_part(url, '/', 2);
