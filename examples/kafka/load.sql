-- Loads the demo's click files into the Kafka topic `clicks`, one JSON record
-- per click, keyed by user (a file → Kafka pipeline; its checkpoint makes a
-- second run add nothing). See examples/kafka/README.md.

SET trigger = 'available-now';

CREATE SOURCE click_files (user_id BIGINT, url VARCHAR, ms_on_page BIGINT, ts TIMESTAMP)
  WITH (connector = 'file', path = 'examples/data/clicks', format = 'json');

CREATE SINK clicks WITH (connector = 'kafka', 'bootstrap.servers' = '127.0.0.1:9092',
                         topic = 'clicks', format = 'json', key = 'user_id',
                         'kafka.batch.num.messages' = '1') AS
SELECT user_id, url, ms_on_page, ts FROM click_files;
