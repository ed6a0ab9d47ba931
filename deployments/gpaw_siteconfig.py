# GPAW build configuration (given to pip through GPAW_CONFIG): Debian's libxc, FFTW and
# OpenBLAS; no MPI or ScaLAPACK on the embedded default. `compiler = 'g++'` is needed: the C
# sources are compiled as C++ and fail on <algorithm> otherwise.
mpi = False
compiler = "g++"
fftw = True
scalapack = False
libraries = ["xc", "fftw3", "openblas"]
