FROM scratch
ADD --unpack=false archive.tar.gz /x/
