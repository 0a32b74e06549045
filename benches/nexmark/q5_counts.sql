-- The inner half of q5 (hot items): bids per auction in 10-second windows
-- sliding every 2 seconds. q5 itself keeps, per window, the auctions with
-- the most bids: a second aggregate over this one, not supported yet.
SELECT auction, count(*) AS num, window_start, window_end
FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)
GROUP BY auction, window_start, window_end
