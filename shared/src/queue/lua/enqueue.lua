-- ARGV: prefix, JSON array of specs. Returns one 1 (created) / 0 (existing) per spec.
return enqueue_all(ARGV[2])
