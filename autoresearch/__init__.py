"""The parts of the overnight research loop that agent_loop.py drives, one concern per module."""
