"""Complexity classification and, in time, routing: which model a request should go to."""
