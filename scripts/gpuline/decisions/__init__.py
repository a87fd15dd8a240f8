"""What decides money and quality: pricing, cost and queue estimates, policy, quota, gates."""
