"""A fake OpenAI upstream for tests and benchmarks; see ``fake_upstream.app``."""
