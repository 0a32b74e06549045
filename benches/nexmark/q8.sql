-- q8 (monitor new users): people who opened an auction in the 10-second
-- window they registered in: each table's distinct keys per window,
-- joined on the key and the window.
SELECT p.id, p.name, p.window_start
FROM (SELECT id, name, window_start, window_end
      FROM TUMBLE(person, date_time, INTERVAL '10' SECOND)
      GROUP BY id, name, window_start, window_end) p
JOIN (SELECT seller, window_start, window_end
      FROM TUMBLE(auction, date_time, INTERVAL '10' SECOND)
      GROUP BY seller, window_start, window_end) a
ON p.id = a.seller AND p.window_start = a.window_start AND p.window_end = a.window_end
