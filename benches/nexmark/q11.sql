-- q11, user sessions: bids per bidder in sessions that end after 10
-- seconds without a bid.
SELECT bidder, count(*) AS bid_count, window_start, window_end
FROM SESSION(bid, date_time, INTERVAL '10' SECOND)
GROUP BY bidder, window_start, window_end
