"""The runtime: what the actors and the data plane share.

messages (actor messages), channels (which message takes which path, taken on which
thread), dataplane (TCP connections beside the actor system), frames and session (its
binary, authenticated frames and their handshake), keys (the cluster key), thespian_auth
(Thespian's frames, tagged with it), wire (the tensor codec), links (link probes),
supervisor (deadlines, device speeds, health), request (one request as a state machine),
attempts (its attempts at chunks, counted with the supervisor), plan_choice (the plan a
new request gets), trace (one record per chunk attempt).
"""
