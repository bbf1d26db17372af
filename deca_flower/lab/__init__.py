"""`deca-flower lab`: rehearse a real deployment on one machine.

A SuperLink with TLS and SuperNode authentication, one SuperNode per site (each in its own
network namespace when the lab may make them), the app submitted with `flwr run` against the
SuperLink, outputs collected, and everything the lab started torn down again.
"""
