# Container targets; filled in by the container work (issue 6).
