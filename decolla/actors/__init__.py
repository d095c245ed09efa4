"""Thespian actors of the collaborative runtime.

  Registrar  (leader)     membership: convention updates, heartbeats, one Worker per device
  Worker     (per device) computes chunks with the model it holds; reports load
  Requester  (per client) per-request, per-stage queues; merges; supervises deadlines
             (decolla.runtime.supervisor) and reassigns chunks; answers the caller
"""
