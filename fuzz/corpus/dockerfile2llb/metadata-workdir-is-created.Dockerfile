FROM busybox
WORKDIR /made/here
