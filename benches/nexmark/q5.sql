-- q5 (hot items): bids per auction in 10-second windows sliding every 2
-- seconds, and per window every auction with the most bids: the counts
-- joined with their per-window maximum (an aggregate over them) on the
-- window.
SELECT ab.auction, ab.num, ab.window_start, ab.window_end
FROM (SELECT auction, count(*) AS num, window_start, window_end
      FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)
      GROUP BY auction, window_start, window_end) ab
JOIN (SELECT max(num) AS maxn, window_start, window_end
      FROM (SELECT auction, count(*) AS num, window_start, window_end
            FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)
            GROUP BY auction, window_start, window_end)
      GROUP BY window_start, window_end) mb
ON ab.window_start = mb.window_start AND ab.window_end = mb.window_end AND ab.num >= mb.maxn
