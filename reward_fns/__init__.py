"""Ready-made reward adapters over ``multitap_rl`` (TRL GRPO/RLOO, DDPO, best-of-N, PPO-style)."""

__all__: list[str] = []
