"""recsvc: personalized financial-product recommendations over gRPC.

The service package: bundle loading (``bundle``), FAISS search (``index``), the
bank's rules (``rules``), ranking (``ranking``), targeting (``targeting``), the
gRPC edge (``service``) and the server process (``server``).
"""

__version__ = "0.1.0"
