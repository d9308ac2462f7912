# escape=`
FROM busybox
RUN echo a `
    b > /out
RUN echo 'c:\dir' > /win
