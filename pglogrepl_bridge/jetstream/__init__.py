"""Fan-out on NATS JetStream: ``publish`` puts each committed transaction into a stream,
exactly once. ``naming`` holds the pure rules (subjects, message ids, headers, where a
restart resumes); ``publisher`` is the IO around them (nats-py, the async replication
stream) and never confirms the slot past what JetStream acknowledged."""
