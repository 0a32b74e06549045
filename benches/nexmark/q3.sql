-- q3 (local item suggestion): auctions of category 10 joined with their
-- sellers from Oregon, Idaho or California (the generator's states are
-- lower case). No time bound relates a seller to their auctions, so the
-- join keeps rows for state_ttl (an hour of trigger time: nothing is
-- forgotten in a run).
-- sink: state_ttl = '1h'
SELECT p.name, p.city, p.state, a.id
FROM auction a JOIN person p ON a.seller = p.id
WHERE a.category = 10 AND (p.state = 'or' OR p.state = 'id' OR p.state = 'ca')
