"""The runtime: what the actors and the data plane share.

messages (actor messages), channels (which message takes which path, taken on which
thread), dataplane (framed pickles over TCP beside the actor system), wire (the tensor
codec), links (link probes), supervisor (deadlines, device speeds, health), request (one
request as a state machine), attempts (its attempts at chunks, counted with the
supervisor), plan_choice (the plan a new request gets), trace (one record per chunk
attempt).
"""
