-- q4 (average price per category): each auction's highest bid while it is
-- open, averaged per category. Nothing bounds an auction's bids by a fixed
-- interval (they run until its own `expires`), so the join keeps rows for
-- state_ttl; the highest bid rises, so the average takes the old maximum
-- back and adds the new one (an aggregate over an aggregate's updates),
-- and the result is a changelog.
-- sink: state_ttl = '1h', output_mode = 'changelog'
SELECT Q.category, avg(Q.final) AS avg_final
FROM (SELECT max(B.price) AS final, A.category
      FROM auction A, bid B
      WHERE A.id = B.auction AND B.date_time BETWEEN A.date_time AND A.expires
      GROUP BY A.id, A.category) Q
GROUP BY Q.category
