"""Tests of the test harness itself: the throwaway nodes and clusters, the waits, the fault
proxy and the hostile-message helper.
"""
