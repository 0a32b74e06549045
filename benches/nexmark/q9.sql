-- q9 (winning bids): every auction with its highest bid while it is open
-- (the earliest among equal prices): a join kept by state_ttl, as an
-- auction's bids run to its own `expires`, and a top-1 without a window
-- per auction, which changes as higher bids arrive, so the result is a
-- changelog.
-- sink: state_ttl = '1h', output_mode = 'changelog'
SELECT id, item_name, description, initial_bid, reserve, date_time, expires, seller, category, extra,
       auction, bidder, price, bid_date_time, bid_extra
FROM (SELECT A.*, B.auction, B.bidder, B.price, B.date_time AS bid_date_time, B.extra AS bid_extra,
             ROW_NUMBER() OVER (PARTITION BY A.id ORDER BY B.price DESC, B.date_time ASC) AS rownum
      FROM auction A, bid B
      WHERE A.id = B.auction AND B.date_time BETWEEN A.date_time AND A.expires)
WHERE rownum <= 1
