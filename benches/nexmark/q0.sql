-- q0, pass-through: every bid, unchanged (the engine's fixed cost per row).
SELECT auction, bidder, price, date_time, extra FROM bid
