"""Fleet (host side): publish, rollouts, collector, views."""
