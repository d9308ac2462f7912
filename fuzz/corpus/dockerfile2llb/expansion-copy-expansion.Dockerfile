FROM busybox
ENV F=a.txt DEST=/dst
COPY $F ${DEST}/
