-- q7 (highest bid) as a top-1: the highest bid of each 10-second window
-- (Nexmark joins the window's maximum back to the bids, so it keeps every
-- bid at the maximum; this keeps the earliest).
SELECT auction, price, bidder, date_time, window_end FROM (
  SELECT auction, price, bidder, date_time, window_start, window_end,
         ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY price DESC, date_time, bidder, auction) AS rn
  FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND))
WHERE rn = 1
