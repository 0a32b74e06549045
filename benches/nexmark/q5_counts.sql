-- The inner half of q5 (hot items): bids per auction in 10-second windows
-- sliding every 2 seconds; q5 joins these counts with their per-window
-- maximum (an aggregate over them).
SELECT auction, count(*) AS num, window_start, window_end
FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)
GROUP BY auction, window_start, window_end
