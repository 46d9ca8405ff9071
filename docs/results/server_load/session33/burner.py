"""Scratch: occupy a share of one core in short bursts, as a server's other threads do (busy B ms, idle I ms)."""
import sys, time
busy, idle = float(sys.argv[1]) / 1000, float(sys.argv[2]) / 1000
while True:
    t = time.perf_counter() + busy
    while time.perf_counter() < t:
        pass
    time.sleep(idle)
