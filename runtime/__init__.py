"""Runtime: reuse controller, policies, cache buffers and executors."""
