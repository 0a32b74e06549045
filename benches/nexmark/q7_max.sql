-- The inner half of q7 (highest bid): the highest price of each 10-second
-- window; q7 joins it back to the bids of its window.
SELECT max(price) AS maxprice, window_start, window_end
FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND)
GROUP BY window_start, window_end
