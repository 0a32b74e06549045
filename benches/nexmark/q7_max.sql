-- The inner half of q7 (highest bid): the highest price of each 10-second
-- window. q7 itself joins it back to the bids, a stream-stream join.
SELECT max(price) AS maxprice, window_start, window_end
FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND)
GROUP BY window_start, window_end
