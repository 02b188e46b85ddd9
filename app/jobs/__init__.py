"""The job domain: states, transitions, events and their payloads, intake, SQL."""
