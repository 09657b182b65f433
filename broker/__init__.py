"""token-broker: Kubernetes service-account JWT in, short-lived GCP access token out."""
