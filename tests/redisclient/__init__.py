"""Tests of the lean Redis client (bus/redis/_client.py) against real redis-servers."""
