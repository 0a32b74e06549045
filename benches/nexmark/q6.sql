-- q6 (average selling price by seller): per seller, the average final
-- price of its last 10 auctions (by when they expire), an auction's final
-- price being its highest bid while it is open. Nexmark's own SQL averages
-- over a ROWS window of the last 10 rows per seller; here the last 10 are
-- a top-10 without a window (ROW_NUMBER() <= 10) over the highest bids,
-- which rise, so the top-10 keeps every auction of a seller and the
-- average takes back what leaves it. The join keeps rows for state_ttl (an
-- auction's bids run to its own `expires`); the result is a changelog.
-- sink: state_ttl = '1h', output_mode = 'changelog'
SELECT Q.seller, avg(Q.final) AS avg_final
FROM (SELECT seller, final,
             ROW_NUMBER() OVER (PARTITION BY seller ORDER BY expires DESC, id DESC) AS rn
      FROM (SELECT max(B.price) AS final, A.id, A.seller, A.expires
            FROM auction A, bid B
            WHERE A.id = B.auction AND B.date_time BETWEEN A.date_time AND A.expires
            GROUP BY A.id, A.seller, A.expires) W) Q
WHERE Q.rn <= 10
GROUP BY Q.seller
