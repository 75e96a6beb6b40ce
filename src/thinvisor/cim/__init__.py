"""thinvisor's CIM/WBEM server: CIM-XML (DSP0200/DSP0201) at ``/cimom``, DMTF profiles.

``thinvisor.cim.schema`` fetches the DMTF CIM Schema and compiles the classes thinvisor
implements, with thinvisor's ``TV_`` subclasses from ``mof/``.
"""
