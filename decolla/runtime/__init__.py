"""The runtime: what the actors and the data plane share.

messages (actor messages), dataplane (framed pickles over TCP beside the actor
system), wire (the tensor codec), links (link probes), supervisor (chunk
assignment and reassignment), trace (one record per chunk attempt).
"""
