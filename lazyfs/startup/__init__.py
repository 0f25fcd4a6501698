"""What happens before a mount's daemon is up: the first requests, opening layers, warm
starts, prefetch lists."""
