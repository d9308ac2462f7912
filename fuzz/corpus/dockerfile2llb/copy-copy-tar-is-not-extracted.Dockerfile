FROM scratch
COPY archive.tar.gz /x/
