"""Fan-out of job changes and trace events to live subscribers."""
