"""Helpers shared by the tests: sandboxes, namespaces, fakes of our adapters, a private bus."""
