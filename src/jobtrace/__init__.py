"""jobtrace: a gRPC control plane for jobs, workflows and their evidence."""

# The generated stubs live in generated/jobtrace/v1 and are installed as the
# subpackage jobtrace.v1; extend_path lets both directories form one package.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)

__version__ = "0.1.0"
