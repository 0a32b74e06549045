-- q5 (hot items) as a top-1: bids per auction in 10-second windows sliding
-- every 2 seconds, and per window the auction with the most bids (the
-- lowest id among ties; Nexmark's own q5 keeps every tied auction, through
-- a join of the counts with their per-window maximum).
SELECT auction, num, window_start, window_end FROM (
  SELECT auction, num, window_start, window_end,
         ROW_NUMBER() OVER (PARTITION BY window_start, window_end ORDER BY num DESC, auction) AS rn
  FROM (SELECT auction, count(*) AS num, window_start, window_end
        FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)
        GROUP BY auction, window_start, window_end))
WHERE rn = 1
