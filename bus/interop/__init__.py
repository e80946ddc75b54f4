"""Speaking other task queues' wire formats, so that a deployment can move to the bus
one worker at a time. Each interop module talks the other system's bytes and keys; none
imports the other system's package.

- :mod:`bus.interop.taskiq`: taskiq's JSON messages and results, taskiq-redis's stream
  and result keys.
"""
