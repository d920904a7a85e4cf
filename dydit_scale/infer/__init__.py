"""Inference: pictures of samples and schedules (the fast dynamic path lives here too)."""
