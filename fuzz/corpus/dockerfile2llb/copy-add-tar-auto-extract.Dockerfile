FROM scratch
ADD archive.tar.gz /x/
